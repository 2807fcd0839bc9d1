"""Load-testing kit for lb-agent: processes, contenders, client, scenarios, report."""
