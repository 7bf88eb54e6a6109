from tdcompress.cli import main

raise SystemExit(main())
