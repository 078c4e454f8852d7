"""`python -m cdp_identity` runs the service."""

from cdp_common.service import run
from cdp_identity.main import DEFINITION

run(DEFINITION)
