"""The bundled demo model: synthetic shapes data, tokenizer, training recipe (see models/README.md)."""
