"""`python -m benchmarks [...]` from a clone: the runner now ships in the package
(fastalign/benchmarks, also `fastalign bench`); this keeps the old command working."""

from fastalign.benchmarks.__main__ import main

raise SystemExit(main())
