"""`python -m cdp_profile` runs the service."""

from cdp_profile.main import main

main()
