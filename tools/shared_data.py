"""Where the tools find the project's shared model and text (../shared beside the checkout): $QUANTOOL_SHARED when
set, so a copy of the repo elsewhere (a snapshot a long benchmark runs from) still finds them."""

from __future__ import annotations

import os
from pathlib import Path

SHARED = Path(os.environ.get("QUANTOOL_SHARED") or Path(__file__).resolve().parents[2] / "shared")
WIKITEXT = SHARED / "data/wikitext2_raw_test.txt"
STORIES260K = SHARED / "models/stories260K"
