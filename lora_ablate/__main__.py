from lora_ablate.cli import main

raise SystemExit(main())
