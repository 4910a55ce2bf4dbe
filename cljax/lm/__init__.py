"""Language-model training on the train floor's loop: ``train.py`` (instruction tuning
and plain-text pretraining, held-out perplexity, generations, export) and ``data.py``
(Alpaca templates with the prompt masked, packed text, fixed parts of sources)."""
