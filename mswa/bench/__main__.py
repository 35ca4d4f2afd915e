from mswa.bench.cli import main

main()
