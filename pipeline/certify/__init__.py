"""How images are certified: the run's settings and work (`plan`), the model pair f∘D (`pair`),
and the chunk schedule of sequential runs (`schedule`)."""
