"""`python -m cdp_dmp` runs the service."""

from cdp_common.service import run
from cdp_dmp.main import DEFINITION

run(DEFINITION)
