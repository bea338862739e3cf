from kvdistill.cli import main

raise SystemExit(main())
