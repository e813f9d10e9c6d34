"""Detection quality of P(machine) scores: metrics, bootstrap intervals, the report, the TF-IDF baseline."""
