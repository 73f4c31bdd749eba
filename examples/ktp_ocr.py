"""Read an Indonesian ID card (KTP) from a photo into JSON with a Qwen3-VL model served by qwenserve.

    python examples/ktp_ocr.py ktp.jpg [--base-url http://localhost:3000/v1] [--model NAME] [--api-key KEY]

The server constrains the reply to `KTP_SCHEMA` (`response_format` `json_schema`), so the printed
JSON always has every field in the right shape (16-digit NIK, dd-mm-yyyy date); whether the values
are read correctly from the photo is up to the model. Defaults come from OPENAI_BASE_URL,
QWENSERVE_MODEL and OPENAI_API_KEY.
"""

from __future__ import annotations

import argparse
import base64
import json
import mimetypes
import os
import sys
from pathlib import Path

TEXT = {"type": "string"}
KTP_SCHEMA = {
    "type": "object",
    "properties": {
        "nik": {"type": "string", "pattern": "^[0-9]{16}$"},
        "nama": TEXT,
        "tempat_lahir": TEXT,
        "tgl_lahir": {"type": "string", "pattern": "^[0-9]{2}-[0-9]{2}-[0-9]{4}$"},
        "jenis_kelamin": {"type": "string", "enum": ["LAKI-LAKI", "PEREMPUAN"]},
        "alamat": {
            "type": "object",
            "properties": {"jalan": TEXT, "rt_rw": TEXT, "kel_desa": TEXT, "kecamatan": TEXT},
            "required": ["jalan", "rt_rw", "kel_desa", "kecamatan"],
            "additionalProperties": False,
        },
        "agama": TEXT,
        "status_perkawinan": TEXT,
        "pekerjaan": TEXT,
        "kewarganegaraan": TEXT,
        "berlaku_hingga": TEXT,
    },
    "required": ["nik", "nama", "tempat_lahir", "tgl_lahir", "jenis_kelamin", "alamat", "agama",
                 "status_perkawinan", "pekerjaan", "kewarganegaraan", "berlaku_hingga"],
    "additionalProperties": False,
}
KTP_FORMAT = {"type": "json_schema", "json_schema": {"name": "ktp", "schema": KTP_SCHEMA, "strict": True}}

# The schema constrains the shape; the prompt tells the model what each field means.
PROMPT = ("This is a photo of an Indonesian identity card (KTP). Read it and answer with its fields as JSON: "
          "nik (the 16-digit NIK), nama, tempat_lahir and tgl_lahir (dd-mm-yyyy) from 'Tempat/Tgl Lahir', "
          "jenis_kelamin, alamat (jalan, rt_rw as 'RT/RW', kel_desa, kecamatan), agama, status_perkawinan, "
          "pekerjaan, kewarganegaraan, berlaku_hingga. Copy the card's text as written.")


def image_data_url(path: Path) -> str:
    kind = mimetypes.guess_type(path.name)[0] or "image/jpeg"
    return f"data:{kind};base64,{base64.b64encode(path.read_bytes()).decode()}"


def read_ktp(client, image: Path, model: str, max_tokens: int = 2048) -> dict:
    """The card's fields as a dict (the server guarantees that the reply matches KTP_SCHEMA)."""
    reply = client.chat.completions.create(
        model=model, temperature=0, max_tokens=max_tokens, response_format=KTP_FORMAT,
        messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image_data_url(image)}},
            {"type": "text", "text": PROMPT}]}])
    choice = reply.choices[0]
    if choice.finish_reason == "length":  # a cut reply is valid JSON only up to the cut
        raise RuntimeError(f"the reply was cut at max_tokens={max_tokens}; raise --max-tokens")
    return json.loads(choice.message.content)


def main(argv: list[str] | None = None) -> int:
    from openai import OpenAI

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image", type=Path, help="photo of the card (JPEG, PNG, WEBP...)")
    parser.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL", "http://localhost:3000/v1"))
    parser.add_argument("--model", default=os.environ.get("QWENSERVE_MODEL", "Qwen/Qwen3-VL-2B-Thinking"))
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "unused"))
    parser.add_argument("--max-tokens", type=int, default=2048, help="reasoning included, for thinking models")
    args = parser.parse_args(argv)
    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    card = read_ktp(client, args.image, args.model, args.max_tokens)
    print(json.dumps(card, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
