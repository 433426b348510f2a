"""Drawing votes: addressed noise (`noise`), batched vote counting over f∘D (`engine`) and its
inference speed-ups (`inference`)."""
