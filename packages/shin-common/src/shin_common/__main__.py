from shin_common.cli import main

raise SystemExit(main())
