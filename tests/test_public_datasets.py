"""Adapters for public benchmarks users download (kunlun.data.public): Criteo on DeepCTR's criteo_sample.txt
(shared/data/samples) and on a tiny Kaggle-layout file; Taobao UserBehavior, KuaiRand-Pure and the BARS x1 sets on tiny files
written here in their layouts (column names from BARS's FuxiCTR dataset configs)."""

import shutil

import numpy as np
import pytest
import torch

from conftest import SHARED_DATA, needs_shared
from kunlun.blocks.embeddings import FeatureInfo
from kunlun.config import model_from_dict
from kunlun.data.batches import Batcher
from kunlun.data.registry import DATASETS, load_raw, prepare_dataset
from kunlun.errors import KunlunError
from kunlun.models import build_model

SMALL = {"d_model": 16, "num_seeds": 4, "seq_summary_tokens": 2, "summary_tokens": 2, "fm_hidden": 16,
         "output_hidden": [16]}


def forward(p, split="train", max_len=8, rows=16):
    torch.manual_seed(0)
    model = build_model(model_from_dict({"name": "kunlun", **SMALL}), FeatureInfo.from_encoder(p.encoder(), max_len))
    batch = Batcher(p, split, max_len, event_windows=True).batch(np.arange(min(rows, len(p.splits[split]))))
    out = model(batch)
    logits = out[0] if isinstance(out, tuple) else out
    assert torch.isfinite(logits).all()
    return logits


# ----------------------------------------------------------------------------- Criteo

def kaggle_line(label, ints, cats):
    return "\t".join([str(label), *("" if v is None else str(v) for v in ints), *cats]) + "\n"


def kaggle_file(rows=30):
    rng = np.random.default_rng(0)
    lines = []
    for r in range(rows):
        ints = [None if rng.random() < 0.2 else int(rng.integers(-2, 500)) for _ in range(13)]
        cats = ["" if rng.random() < 0.2 else f"{int(rng.integers(0, 4)):08x}" for _ in range(26)]
        lines.append(kaggle_line(r % 2, ints, cats))
    return "".join(lines)


@needs_shared
def test_criteo_sample_prepares_batches_and_runs_a_model(tmp_path):
    folder = tmp_path / "criteo"
    folder.mkdir()
    shutil.copy(SHARED_DATA / "samples" / "criteo_sample.txt", folder / "train.txt")
    raw = load_raw("criteo", tmp_path)
    assert [len(s) for s in raw.splits.values()] == [160, 20, 20]  # 8:1:1 of the sample's 200 rows
    rows = np.sort(np.concatenate([s.row for s in raw.splits.values()]))
    assert (rows == np.arange(200)).all()
    again = load_raw("criteo", tmp_path)  # the split is fixed by its seed
    assert (again.splits["test"].row == raw.splits["test"].row).all()
    train = raw.splits["train"].columns
    # first data row: I3 = 260 → log(261); I1 empty → 0; C19 empty → the missing id
    first = next(s for s in raw.splits.values() if 0 in s.row)
    k, c = int(np.flatnonzero(first.row == 0)[0]), first.columns
    assert c["I3"][k] == pytest.approx(np.log(261)) and c["I1"][k] == 0
    assert c["C1"][k] == "05db9164" and c["C19"][k] == "__missing__"
    assert (train["I2"] < 0).any()  # -1 stays negative: sign(v) log(1 + |v|)
    p = prepare_dataset("criteo", tmp_path)
    assert p.schema.numeric == tuple(f"I{i}" for i in range(1, 14)) and not p.schema.sequences
    forward(p)


def test_criteo_kaggle_layout_and_test_file_without_labels(tmp_path):
    folder = tmp_path / "criteo"
    folder.mkdir()
    (folder / "train.txt").write_text(kaggle_file())
    p = prepare_dataset("criteo", tmp_path)
    assert sum(len(s) for s in p.splits.values()) == 30
    forward(p, "valid")
    # Kaggle's test.txt: the same fields without the label
    test = tmp_path / "test.txt"
    test.write_text("".join(line.split("\t", 1)[1] for line in kaggle_file(5).splitlines(keepends=True)))
    raw = DATASETS["criteo"].load(folder, test, labels=False)
    assert not raw.has_labels and len(raw.splits["file"]) == 5
    with pytest.raises(KunlunError, match="39 without the label|expected 40"):
        DATASETS["criteo"].load(folder, test, labels=True)


@pytest.mark.parametrize("mangle,needle", [
    (lambda ls: ls[:7] + ["1\t2\t3\n"] + ls[7:], r"train.txt: line 8 has 3 fields, expected 40"),
    (lambda ls: ls[:4] + ["2" + ls[4][1:]] + ls[5:], r"train.txt: label column 'label' must be 0 or 1, found 2 at data row 5"),
    (lambda ls: ls[:3] + [ls[3].replace("\t", "\tx", 1)] + ls[4:], r"train.txt: column 'I1' must be numeric, found text .* at data row 4"),
])
def test_bad_criteo_lines_name_file_and_line(tmp_path, mangle, needle):
    folder = tmp_path / "criteo"
    folder.mkdir()
    (folder / "train.txt").write_text("".join(mangle(kaggle_file().splitlines(keepends=True))))
    with pytest.raises(KunlunError, match=needle) as exc:
        load_raw("criteo", tmp_path)
    assert "\n" not in str(exc.value)


# ----------------------------------------------------------------------------- Taobao UserBehavior

# user 1: 10 events, two in the same second (t=700); user 2: 10 events
UB = """1,100,7,pv,100
1,101,7,pv,200
1,100,7,cart,300
1,102,8,pv,400
1,103,8,pv,500
1,100,7,buy,600
1,104,9,pv,700
1,105,9,fav,700
1,101,7,pv,800
1,106,8,pv,900
2,200,5,pv,1000
2,201,5,pv,1100
2,200,5,fav,1200
2,202,6,pv,1300
2,203,6,pv,1400
2,100,7,pv,1500
2,204,6,cart,1600
2,205,5,pv,1700
2,200,5,buy,1800
2,206,6,pv,1900
"""


def dataset_folder(root, name, files):
    """root/name holding ``files`` ({file name: text}): a dataset folder in an adapter's layout."""
    folder = root / name
    folder.mkdir(exist_ok=True)
    for f, text in files.items():
        (folder / f).write_text(text)
    return folder


def ub_folder(root, text=UB):
    return dataset_folder(root, "taobao-userbehavior", {"UserBehavior.csv": text})


def test_user_behavior_labels_histories_and_chronological_split(tmp_path):
    ub_folder(tmp_path)
    raw = load_raw("taobao-userbehavior", tmp_path)
    assert [len(s) for s in raw.splits.values()] == [16, 2, 2]
    ev = raw.events["history"]
    assert list(ev["event"][:3]) == ["pv", "pv", "cart"] and list(ev["category"][:3]) == [7, 7, 7]
    tr = raw.splits["train"]
    label_by_time = dict(zip(tr.time.tolist(), tr.columns["label"].tolist()))
    assert label_by_time[100] == 0 and label_by_time[300] == 1 and label_by_time[700] in (0, 1)
    # history = strictly earlier events of the same user; the two t=700 events do not see each other
    for s in raw.splits.values():
        for start, end, t in zip(s.seq_start["history"], s.seq_end["history"], s.time):
            assert (ev["time"][start:end] < t).all()
            assert len(set(ev["item"][start:end].tolist()) & {200, 201}) == 0 or t >= 1000
    seven = [end - start for start, end, t in zip(tr.seq_start["history"], tr.seq_end["history"], tr.time) if t == 700]
    assert seven == [6, 6]
    test = raw.splits["test"]
    assert sorted(test.time.tolist()) == [900, 1900] and set(raw.splits["valid"].time.tolist()) == {800, 1800}
    p = prepare_dataset("taobao-userbehavior", tmp_path)
    assert p.schema.sequences[0].side == (("category", "category"),)
    forward(p, "train")
    forward(p, "test")


def test_user_behavior_scores_one_file_whole(tmp_path):
    folder = ub_folder(tmp_path)
    extra = tmp_path / "more.csv"
    extra.write_text(UB.replace("1,", "3,", 1))
    raw = DATASETS["taobao-userbehavior"].load(folder, extra)
    assert list(raw.splits) == ["file"] and len(raw.splits["file"]) == 20


@pytest.mark.parametrize("bad,needle", [
    ("1,100,7,click,100\n", r"UserBehavior.csv: column 'behavior_type' \(4th field\) must be one of pv/cart/fav/buy, found 'click' on line 4"),
    ("1,100,7,pv\n", r"UserBehavior.csv: line 4 has 4 fields, expected 5"),
    ("1,abc,7,pv,100\n", r"UserBehavior.csv: column 'item' must be numeric, found text 'abc' at data row 4"),
])
def test_bad_user_behavior_lines_name_file_and_line(tmp_path, bad, needle):
    lines = UB.splitlines(keepends=True)
    ub_folder(tmp_path, "".join(lines[:3] + [bad] + lines[3:]))
    with pytest.raises(KunlunError, match=needle) as exc:
        load_raw("taobao-userbehavior", tmp_path)
    assert "\n" not in str(exc.value)


# ----------------------------------------------------------------------------- BARS x1 (tiny files in their layout)

AMAZON = {
    "train.csv": """label,user_id,item_id,cate_id,item_history,cate_history
1,1,11,3,10^12,2^3
0,1,13,4,10^12^11,2^3^3
1,2,12,3,14,5
0,2,10,2,,
1,3,11,3,10^11^12^13,2^3^3^4
0,3,14,5,10,2
""",
    "test.csv": """label,user_id,item_id,cate_id,item_history,cate_history
1,1,12,3,10^12^11^13,2^3^3^4
0,2,99,9,14^12,5^3
""",
}
TAOBAO_HEAD = ("clk,userid,cms_segid,cms_group_id,final_gender_code,age_level,pvalue_level,shopping_level,occupation,"
               "new_user_class_level,adgroup_id,cate_id,campaign_id,customer,brand,pid,btag,price,cate_his,brand_his,btag_his\n")
TAOBAO = {
    "train.csv": TAOBAO_HEAD + """0,7,0,3,1,2,1,3,0,2,501,6,70,80,90,430548_1007,1,9.9,6^7,90^91,1^2
1,7,0,3,1,2,1,3,0,2,502,7,71,81,91,430548_1007,1,15.0,6^7^7,90^91^91,1^2^4
0,8,1,4,2,3,2,2,1,3,503,6,70,80,90,430539_1007,1,199.0,,,
1,8,1,4,2,3,2,2,1,3,501,6,70,80,90,430539_1007,1,9.9,6,90,3
""",
    "test.csv": TAOBAO_HEAD + """1,7,0,3,1,2,1,3,0,2,501,6,70,80,90,430548_1007,1,9.9,6^7^7^6,90^91^91^90,1^2^4^1
0,9,1,4,2,3,2,2,1,3,504,8,72,82,92,430548_1007,1,3.5,8,92,1
""",
}
KUAI = {
    "train.csv": """user_id,item_id,is_click,pos_items,neg_items
1,100,1,101^102,103
1,103,0,101^102^100,103^104
2,101,1,,100^102
2,104,0,101,100^102^103
""",
    "test.csv": """user_id,item_id,is_click,pos_items,neg_items
1,105,0,101^102^100,103^104
2,102,1,101^105,100^102^103^104
""",
}
BARS = {"amazonelectronics_x1": AMAZON, "taobaoad_x1": TAOBAO, "kuaivideo_x1": KUAI}


def bars_folder(root, name, files=None):
    folder = root / name
    folder.mkdir(exist_ok=True)
    for f, text in (files or BARS[name]).items():
        (folder / f).write_text(text)
    return folder


@pytest.mark.parametrize("name", list(BARS))
def test_bars_sets_load_prepare_and_run_a_model(tmp_path, name):
    bars_folder(tmp_path, name)
    raw = load_raw(name, tmp_path)
    rows = {f: text.count("\n") - 1 for f, text in BARS[name].items()}
    # valid is a fixed random tenth of train.csv (none of these few rows); test is test.csv, unseen by model selection
    assert [len(raw.splits[s]) for s in ("train", "valid", "test")] == [rows["train.csv"], 0, rows["test.csv"]]
    # every row's history is its own cell, in order: row k's range holds exactly its '^'-separated values
    q = raw.schema.sequences[0]
    cell = {"amazonelectronics_x1": "item_history", "taobaoad_x1": "cate_his", "kuaivideo_x1": "pos_items"}[name]
    for split, f in (("train", "train.csv"), ("test", "test.csv")):
        lines = BARS[name][f].splitlines()
        col = lines[0].split(",").index(cell)
        s = raw.splits[split]
        for k, line in enumerate(lines[1:]):
            want = [v for v in line.split(",")[col].split("^") if v]
            got = raw.events[q.name]["item"][s.seq_start[q.name][k]:s.seq_end[q.name][k]]
            assert list(got) == want
    assert not any(sq.has_time for sq in raw.schema.sequences)
    p = prepare_dataset(name, tmp_path)
    forward(p, "train")
    forward(p, "test")


def test_bars_taobao_histories_carry_behaviour_type_and_brand(tmp_path):
    bars_folder(tmp_path, "taobaoad_x1")
    raw = load_raw("taobaoad_x1", tmp_path)
    s, ev = raw.splits["train"], raw.events["behavior"]
    a, b = s.seq_start["behavior"][1], s.seq_end["behavior"][1]
    assert list(ev["item"][a:b]) == ["6", "7", "7"] and list(ev["event"][a:b]) == ["1", "2", "4"]
    assert list(ev["brand_his"][a:b]) == ["90", "91", "91"]
    assert raw.schema.numeric == ("price",) and s.columns["price"][2] == 199.0
    assert s.seq_start["behavior"][2] == s.seq_end["behavior"][2]  # an empty cell is an empty history


@pytest.mark.parametrize("name,file,old,new,needle", [
    ("amazonelectronics_x1", "train.csv", "0,1,13,4,10^12^11,2^3^3", "0,1,13,4,10^12^11,2^3",
     r"amazonelectronics_x1/train.csv: column 'cate_history' has 2 values at data row 2, but 'item_history' has 3"),
    ("amazonelectronics_x1", "test.csv", "0,2,99,9,14^12,5^3", "0,2,99,9,14^12,5^3,7",
     r"amazonelectronics_x1/test.csv: line 3 has 7 fields, expected 6"),
    ("kuaivideo_x1", "train.csv", "2,101,1,,100^102", "2,101,1,,100^^102",
     r"kuaivideo_x1/train.csv: column 'neg_items' has an empty item between '\^' separators at data row 3"),
    ("taobaoad_x1", "train.csv", ",9.9,6,90,3", ",cheap,6,90,3",
     r"taobaoad_x1/train.csv: column 'price' must be numeric, found text 'cheap' at data row 4"),
    ("kuaivideo_x1", "test.csv", "1,105,0,", "1,105,2,", r"kuaivideo_x1/test.csv: label column 'is_click' must be 0 or 1, found 2 at data row 1"),
])
def test_bad_bars_lines_name_file_and_line(tmp_path, name, file, old, new, needle):
    files = dict(BARS[name])
    assert old in files[file]
    files[file] = files[file].replace(old, new)
    bars_folder(tmp_path, name, files)
    with pytest.raises(KunlunError, match=needle) as exc:
        load_raw(name, tmp_path)
    assert "\n" not in str(exc.value)


# ----------------------------------------------------------------------------- KuaiRand-Pure (tiny logs in its layout)

KR_HEAD = ("user_id,video_id,date,hourmin,time_ms,is_click,is_like,is_follow,is_comment,is_forward,is_hate,long_view,"
           "play_time_ms,duration_ms,profile_stay_time,comment_stay_time,is_profile_enter,is_rand,tab\n")


def kr_rows(user, start_s, clicks, likes, first_video=0):
    return "".join(f"{user},{first_video + k},20220408,1000,{(start_s + 60 * k) * 1000 + 123},{c},{lk},0,0,0,0,0,0,0,0,0,0,0,{k % 3}\n"
                   for k, (c, lk) in enumerate(zip(clicks, likes)))


KR = {
    "log_standard_4_08_to_4_21_pure.csv": KR_HEAD + kr_rows(1, 1649376000, [1, 0, 1, 0, 1], [1, 0, 0, 0, 0])
    + kr_rows(2, 1649376000, [0, 0, 1, 1, 0], [0, 0, 0, 1, 0], 10),
    "log_standard_4_22_to_5_08_pure.csv": KR_HEAD + kr_rows(1, 1650600000, [0, 1, 1, 0, 0], [0, 0, 1, 0, 0], 5)
    + kr_rows(2, 1650600000, [1, 0, 0, 1, 1], [0, 0, 0, 0, 1], 15),
}


def kr_folder(root, files=KR):
    return dataset_folder(root, "kuairand-pure", files)


def test_kuairand_pure_joins_both_logs_on_one_timeline(tmp_path):
    kr_folder(tmp_path)
    raw = load_raw("kuairand-pure", tmp_path)
    assert [len(s) for s in raw.splits.values()] == [16, 2, 2]
    ev = raw.events["history"]
    # user 1's timeline: the first log's 5 exposures, then the second's; types liked / clicked / skipped
    assert list(ev["item"][:10]) == list(range(10)) and list(ev["event"][:3]) == ["liked", "skipped", "clicked"]
    test = raw.splits["test"]
    assert sorted(test.columns["video"].tolist()) == [9, 19]  # each user's last exposure
    k = int(np.flatnonzero(test.columns["video"] == 9)[0])
    assert test.seq_end["history"][k] - test.seq_start["history"][k] == 9 and test.time[k] == 1650600000 + 240
    p = prepare_dataset("kuairand-pure", tmp_path)
    forward(p, "train")
    forward(p, "test")


def test_bad_kuairand_line_names_file_and_row(tmp_path):
    files = dict(KR)
    name = "log_standard_4_22_to_5_08_pure.csv"
    lines = files[name].splitlines(keepends=True)
    fields = lines[3].split(",")
    fields[5] = "2"  # is_click of data row 3
    lines[3] = ",".join(fields)
    files[name] = "".join(lines)
    kr_folder(tmp_path, files)
    with pytest.raises(KunlunError, match=rf"{name}: label column 'is_click' must be 0 or 1, found 2 at data row 3"):
        load_raw("kuairand-pure", tmp_path)


def test_bars_valid_is_held_out_of_train_csv_and_test_csv_stays_test(tmp_path):
    """BARS early-stops on test.csv; here a fixed random tenth of train.csv is the validation split, the rest trains,
    and test.csv is only ever the test split."""
    head, *lines = BARS["amazonelectronics_x1"]["train.csv"].splitlines()
    train = [head] + [lines[k % len(lines)] for k in range(300)]
    folder = bars_folder(tmp_path, "amazonelectronics_x1", {"train.csv": "\n".join(train) + "\n",
                                                            "test.csv": BARS["amazonelectronics_x1"]["test.csv"]})
    raw = load_raw("amazonelectronics_x1", tmp_path)
    tr, va, te = (raw.splits[k] for k in ("train", "valid", "test"))
    assert 15 <= len(va) <= 45 and len(tr) + len(va) == 300
    assert sorted([*tr.row.tolist(), *va.row.tolist()]) == list(range(300))
    assert len(te) == BARS["amazonelectronics_x1"]["test.csv"].count("\n") - 1
    q = raw.schema.sequences[0].name
    for s in (tr, va):  # each row keeps its own history: the cell of its source line
        for k, r in enumerate(s.row.tolist()):
            cell = train[1 + r].split(",")[4]
            want = [v for v in cell.split("^") if v]
            assert list(raw.events[q]["item"][s.seq_start[q][k]:s.seq_end[q][k]]) == want
    assert load_raw("amazonelectronics_x1", folder.parent).splits["valid"].row.tolist() == va.row.tolist()  # fixed
