"""`python -m cdp_profile` runs the service."""

from cdp_common.service import run
from cdp_profile.main import DEFINITION

run(DEFINITION)
