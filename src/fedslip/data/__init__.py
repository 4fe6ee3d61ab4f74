"""Data: loading text-classification datasets (`sources`, `synthetic`) and splitting them over clients
(`partition`)."""
