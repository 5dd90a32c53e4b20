from cbm_intervene.cli import main

raise SystemExit(main())
