"""The monitor: drift windows over live traffic, canary verdicts and live accuracy (DESIGN.md "Monitor")."""
