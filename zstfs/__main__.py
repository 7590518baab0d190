from zstfs.cli import main

raise SystemExit(main())
