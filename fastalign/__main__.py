from fastalign.cli import main

raise SystemExit(main())
