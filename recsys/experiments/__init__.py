"""Online experiments: assignment and exploration policies (``policy``), the exposure and outcome logs
(``logs``), the replay simulator (``simulate``), and the analysis notebooks and the report read (``analysis``)."""
