"""Ask the bundled demo model about a shape drawn with Pillow, in-process (no server): python examples/inprocess.py"""

from PIL import Image, ImageDraw

import edgevlm

image = Image.new("RGB", (240, 200), "white")
ImageDraw.Draw(image).ellipse([70, 50, 170, 150], fill=(220, 30, 30))  # a red circle

with edgevlm.load() as model:  # the bundled demo model; edgevlm.load("path/to/package") for an exported one
    print("Q: What shape is this?")
    print("A:", model.ask("What shape is this?", images=[image], temperature=0).strip())

    print("Q: Describe the image.\nA:", end="")
    for delta in model.ask("Describe the image.", images=[image], temperature=0, stream=True):
        print(delta, end="", flush=True)  # the text as it is generated
    print()

    reply = model.chat(
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                      {"type": "text", "text": "Answer in JSON."}]}],
        temperature=0, max_tokens=60,
        response_format={"type": "json_schema", "json_schema": {"name": "shape", "schema": {
            "type": "object", "additionalProperties": False, "required": ["shape", "color", "count"],
            "properties": {"shape": {"enum": ["circle", "square", "triangle", "star"]},
                           "color": {"enum": ["red", "orange", "yellow", "green", "blue", "purple", "black", "white"]},
                           "count": {"type": "integer", "minimum": 1, "maximum": 3}}}}})
    print("JSON:", reply.text, f"({reply.usage.prompt_tokens} prompt + {reply.usage.completion_tokens} tokens)")

    try:
        model.ask("What shape is this?", images=[image], temperature=5)
    except edgevlm.InvalidRequestError as error:  # the server's 400, as an exception
        print(f"error ({error.param}): {error.message}")
