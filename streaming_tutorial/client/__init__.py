"""What runs in the learner's process (a notebook, a test, a script): reading streams and measuring them."""
