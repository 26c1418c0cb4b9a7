from .gateway import main

raise SystemExit(main())
