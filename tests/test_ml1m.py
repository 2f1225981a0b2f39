"""MovieLens-1M in its official layout: ``::``-separated, no header, Latin-1 titles; one adapter for the full set
(``ml-1m``) and for the shared subset of users 1–2999 (``ml-1m-first-half``)."""

import numpy as np
import pytest

from conftest import SHARED_DATA, needs_shared
from kunlun.data.registry import DATASETS, prepare_dataset
from kunlun.errors import KunlunError

# users 1 and 2; user 2 rates two movies in the same second (neither is in the other's history)
RATINGS = """1::10::5::1000
1::20::3::2000
1::30::4::3000
1::10::2::4000
1::40::5::5000
1::20::1::6000
1::30::4::7000
1::10::5::8000
1::40::3::9000
1::20::4::10000
2::20::4::500
2::10::1::600
2::30::5::600
2::40::2::700
2::20::5::800
2::10::4::900
2::30::1::1000
2::40::5::1100
2::20::2::1200
2::30::4::1300
"""
MOVIES = """10::Toy Story (1995)::Animation|Children's|Comedy
20::Misérables, Les (1995)::Drama|Musical
30::Star Wars: Episode IV - A New Hope (1977)::Action|Adventure|Fantasy|Sci-Fi
40::Untitled::Film-Noir
"""
USERS = """1::F::1::10::48067
2::M::56::16::98107-2117
3::M::25::15::55117
"""


def ml1m_folder(root, ratings=RATINGS, movies=MOVIES, users=USERS):
    folder = root / "ml-1m"
    folder.mkdir(exist_ok=True)
    (folder / "ratings.dat").write_text(ratings, encoding="latin1")
    (folder / "movies.dat").write_text(movies, encoding="latin1")
    (folder / "users.dat").write_text(users, encoding="latin1")
    return folder


def all_rows(p, column):
    j = [c for c, _ in p.schema.categorical].index(column)
    return {k: s.cat[:, j] for k, s in p.splits.items()}


def test_official_layout_is_read_with_user_and_movie_features(tmp_path):
    ml1m_folder(tmp_path)
    from kunlun.data.registry import load_raw

    raw = load_raw("ml-1m", tmp_path)
    assert sum(len(s) for s in raw.splits.values()) == 20
    train = raw.splits["train"].columns
    assert [len(s) for s in raw.splits.values()] == [16, 2, 2]  # 8 / 1 / 1 of each user's 10 ratings
    first = np.flatnonzero(train["user"] == 2)[0]
    assert raw.splits["train"].time[first] == 500 and train["label"][first] == 1.0  # rating 4 → positive
    # user features: gender, age bucket, occupation, first three digits of the zip code (a zip+4 too)
    cat = dict(raw.schema.categorical)
    assert {"gender", "age_bucket", "occupation", "zip3"} <= set(cat)
    assert set(train["zip3"][train["user"] == 2]) == {"981"} and set(train["gender"][train["user"] == 1]) == {"F"}
    assert set(train["age_bucket"][train["user"] == 2].astype(int)) == {56}
    assert set(train["occupation"][train["user"] == 1].astype(int)) == {10}
    # movie features: release year from the title (Latin-1 title decoded), primary genre, 18 genre flags
    by_item = {int(i): k for k, i in enumerate(train["item"])}
    k20, k30, k40 = by_item[20], by_item[30], by_item[40]
    assert train["year"][k20] == 1995 and train["genre"][k20] == "Drama" and train["year"][k40] == 0
    assert train["genre"][k30] == "Action" and train["is_Sci-Fi"][k30] == 1 and train["is_Drama"][k30] == 0
    assert train["is_Children's"][by_item[10]] == 1
    # history = strictly earlier ratings with their event type; user 2's two ratings at t=600 do not see each other
    ev = raw.events["history"]
    s = raw.splits["train"]
    at600 = np.flatnonzero((train["user"] == 2) & (raw.splits["train"].time == 600))
    assert len(at600) == 2
    for i in at600:
        lo, hi = s.seq_start["history"][i], s.seq_end["history"][i]
        assert ev["time"][lo:hi].tolist() == [500] and ev["event"][lo:hi].tolist() == ["liked"]


def test_ml1m_prepares_through_the_registry_and_its_cache_covers_every_file(tmp_path):
    folder = ml1m_folder(tmp_path)
    p = prepare_dataset("ml-1m", tmp_path)
    assert p.name == "ml-1m" and sum(len(s) for s in p.splits.values()) == 20
    assert set(DATASETS["ml-1m"].files) == {"ratings.dat", "movies.dat", "users.dat"}
    zip_vocab = p.vocabs["zip3"]
    assert len(zip_vocab) == 2 + 2  # 480, 981 (+ pad, OOV): user 3 never rated
    # each of the three files is part of the cache key: a changed file is read again, not served from the cache
    (folder / "users.dat").write_text(USERS.replace("48067", "12345"), encoding="latin1")
    assert "123" in prepare_dataset("ml-1m", tmp_path).vocabs["zip3"].keys.tolist()
    (folder / "movies.dat").write_text(MOVIES.replace("Film-Noir", "Western"), encoding="latin1")
    assert "Western" in prepare_dataset("ml-1m", tmp_path).vocabs["genre"].keys.tolist()
    (folder / "ratings.dat").write_text(RATINGS.replace("2::30::4::1300\n", ""), encoding="latin1")
    assert sum(len(s) for s in prepare_dataset("ml-1m", tmp_path).splits.values()) == 19


@pytest.mark.parametrize(
    "file,content,needle",
    [
        ("ratings.dat", RATINGS.replace("1::40::5::5000", "1::40::5"), "ratings.dat: line 5 has 3 '::'-separated fields, expected 4"),
        ("ratings.dat", RATINGS.replace("1::40::5::5000", "1::40::five::5000"),
         "ratings.dat: field 'rating' must be an integer, found 'five' on line 5"),
        ("ratings.dat", RATINGS.replace("1::40::5::5000", "1::40::9::5000"), "ratings.dat: column 'rating' must be a rating in [0, 5], found 9"),
        ("movies.dat", MOVIES.replace("Drama|Musical", "Drama|Musicals"), "movies.dat: line 2 has genre 'Musicals'"),
        ("users.dat", USERS.replace("2::M::56::16", "2::M::old::16"), "users.dat: field 'age' must be an integer, found 'old' on line 2"),
        ("users.dat", "", "users.dat: file is empty"),
    ],
)
def test_bad_ml1m_files_name_file_line_and_field(tmp_path, file, content, needle):
    folder = ml1m_folder(tmp_path)
    (folder / file).write_text(content, encoding="latin1")
    with pytest.raises(KunlunError) as e:
        prepare_dataset("ml-1m", tmp_path)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_ml1m_needs_its_side_files(tmp_path):
    (ml1m_folder(tmp_path) / "users.dat").unlink()
    with pytest.raises(KunlunError, match=r"dataset 'ml-1m' not found \(missing users.dat\)"):
        prepare_dataset("ml-1m", tmp_path)


@needs_shared
def test_ml1m_first_half_is_users_1_to_2999_with_every_rating():
    p = prepare_dataset("ml-1m-first-half", SHARED_DATA)
    rows = {k: len(s) for k, s in p.splits.items()}
    assert sum(rows.values()) == 487650  # (split order differs between a fresh and a cached preparation)
    assert rows == {"train": 391327, "valid": 48897, "test": 47426}
    users = np.unique(np.concatenate([p.vocabs["user"].keys[s.cat[:, 0] - 2] for s in p.splits.values()]))
    assert users[0] == 1 and users[-1] == 2999 and len(users) == 2999
    ctr = np.mean(np.concatenate([s.label for s in p.splits.values()]))
    assert 0.57 < ctr < 0.58  # 57.5 % of these ratings are 4 or 5
    assert len(p.vocabs["zip3"]) > 300 and len(p.vocabs["occupation"]) == 21 + 2 and len(p.vocabs["age_bucket"]) == 7 + 2
    assert DATASETS["ml-1m-first-half"].title == "ML-1M users 1–2999"
    # histories: the user's strictly earlier ratings, complete (the next event is not earlier than the impression)
    ev, test = p.events["history"], p.splits["test"]
    rng = np.random.default_rng(0)
    for i in rng.choice(len(test), 300, replace=False):
        lo, hi = test.seq_start["history"][i], test.seq_end["history"][i]
        assert hi > lo and np.all(ev.time[lo:hi] < test.time[i]) and ev.time[hi] >= test.time[i]
