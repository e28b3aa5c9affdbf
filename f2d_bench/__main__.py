from f2d_bench.cli import main

raise SystemExit(main())
