"""Send one chat completion with an image to a DvD gateway (the official `openai` client) and check the answer.

    python deploy/chat_with_image.py http://127.0.0.1:8000/v1

Prints the model's text and usage; exits 1 unless the text is non-empty and the usage adds up, with the
image's tokens counted in the prompt. A smoke test for any deployment; deploy/image-check.sh runs it.
"""

from __future__ import annotations

import base64
import io
import json
import os
import sys

from openai import OpenAI
from PIL import Image

MAX_TOKENS = 16


def image_data_url(width: int = 640, height: int = 480) -> str:
    """A colour-gradient PNG, as a data URL."""
    red = Image.linear_gradient("L").resize((width, height))
    blue = red.transpose(Image.Transpose.ROTATE_90).resize((width, height))
    image = Image.merge("RGB", (red, Image.new("L", (width, height), 96), blue))
    png = io.BytesIO()
    image.save(png, format="PNG")
    return "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()


def problems_with(text: str, usage) -> list[str]:
    details = usage.prompt_tokens_details
    image_tokens = getattr(details, "image_tokens", None) or 0
    found = []
    if not text.strip():
        found.append("the answer has no text")
    if not 0 < usage.completion_tokens <= MAX_TOKENS:
        found.append(f"completion_tokens {usage.completion_tokens} outside 1..{MAX_TOKENS}")
    if usage.total_tokens != usage.prompt_tokens + usage.completion_tokens:
        found.append(f"total_tokens {usage.total_tokens} != prompt + completion")
    if not 0 < image_tokens < usage.prompt_tokens:
        found.append(f"image_tokens {image_tokens} not within the prompt's {usage.prompt_tokens}")
    return found


def main(base_url: str) -> int:
    client = OpenAI(base_url=base_url, api_key=os.environ.get("OPENAI_API_KEY", "none"), timeout=300, max_retries=0)
    model = client.models.list().data[0].id
    reply = client.chat.completions.create(model=model, max_tokens=MAX_TOKENS, temperature=0, messages=[
        {"role": "user", "content": [
            {"type": "text", "text": "Describe this image in one sentence."},
            {"type": "image_url", "image_url": {"url": image_data_url()}}]}])
    choice = reply.choices[0]
    text = choice.message.content or ""
    print(json.dumps({"model": reply.model, "finish_reason": choice.finish_reason, "text": text,
                      "usage": reply.usage.model_dump(exclude_none=True)}, indent=2, ensure_ascii=False))
    found = problems_with(text, reply.usage)
    for problem in found:
        print(f"FAIL: {problem}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000/v1"))
