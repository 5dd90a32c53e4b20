from basisrot_pipeline.cli import main

raise SystemExit(main())
