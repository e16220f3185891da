"""``python -m mlmath_native.demo NAME``: see :mod:`mlmath_native.demo`."""

from mlmath_native.demo import main

raise SystemExit(main())
