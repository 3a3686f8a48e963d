"""Branch-Train-Merge: operations, pipeline, forests and the posterior mixture, the demo."""
