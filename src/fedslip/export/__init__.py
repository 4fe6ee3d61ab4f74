"""Use what a run trained outside fedslip: fold a finished run's model into a plain PEFT LoRA folder
(`peft_folder`), and classify new text with such a folder (`predict`)."""
