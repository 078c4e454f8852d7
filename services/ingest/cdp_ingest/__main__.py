"""`python -m cdp_ingest` runs the service."""

from cdp_common.service import run
from cdp_ingest.main import DEFINITION

run(DEFINITION)
