from sam_overparam.cli import main

raise SystemExit(main())
