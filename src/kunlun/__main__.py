from kunlun.cli import main

main()
