from recon_prune.cli import main

raise SystemExit(main())
