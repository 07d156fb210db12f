from medcare_dist.cli import main

raise SystemExit(main())
