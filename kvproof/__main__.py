from kvproof.cli import main
raise SystemExit(main())
