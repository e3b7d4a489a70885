from anomaseg.cli import main

raise SystemExit(main())
