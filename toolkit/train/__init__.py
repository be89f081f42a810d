"""The training stage: the step engine, the loop, reports, train, evaluate and prune."""
