"""Analysis: what researchers do with a trained dictionary, a subpackage per task: ``features`` (read them),
``interventions`` (edit them inside the model), ``compare`` (two dictionaries, or two sites across an MLP) and
``autointerp`` (explain and score them with a language model). Nothing below this layer imports it."""
