"""`python -m cdp_identity` runs the service."""

from cdp_identity.main import main

main()
