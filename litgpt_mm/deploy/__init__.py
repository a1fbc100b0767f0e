"""Inference and serving: the assistant, chat prompts, OpenAI messages, speech, the server and the Gradio app."""
