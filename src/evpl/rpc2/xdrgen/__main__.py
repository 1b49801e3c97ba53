"""``python -m evpl.rpc2.xdrgen``: the .x compiler's command line (same as ``evpl xdrgen``).

The compiler is the package itself; this entry only calls its ``main``.
``evpl.rpc2`` imports the compiler when it is imported, so running the
compiler's own module as ``__main__`` would execute it a second time (and
runpy warns about that); running this small module does not.
"""

import sys

from evpl.rpc2.xdrgen import main

sys.exit(main())
