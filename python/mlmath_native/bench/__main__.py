"""``python -m mlmath_native.bench``: see :mod:`mlmath_native.bench`."""

from mlmath_native.bench import main

raise SystemExit(main())
