"""`python -m cdp_ingest` runs the service."""

from cdp_ingest.main import main

main()
