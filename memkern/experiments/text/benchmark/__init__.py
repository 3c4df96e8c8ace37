"""One benchmark for localizing memorized sequences in a text run (docs/text.md, "Localization
benchmark"): DEL drops each method's top neurons for a target and measures what is forgotten
and what it costs; INJ plants fresh canaries into known neurons and asks each method for them."""
