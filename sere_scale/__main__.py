from sere_scale.cli import main

raise SystemExit(main())
