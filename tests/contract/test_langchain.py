"""LangChain's DALL-E wrapper and tool (langchain-community) against the gateway (acceptance 7).

They join `data[].url` of the answer, so they only work when a dall-e request without
`response_format` gets URLs, as OpenAI's default was. dall-e-3 is retired at OpenAI; here it is
served by a compatible upstream that still serves it (the fake, `follows_retirements: false`).
"""

from __future__ import annotations

import io

import httpx
from langchain_community.tools.openai_dalle_image_generation import OpenAIDALLEImageGenerationTool
from langchain_community.utilities.dalle_image_generator import DallEAPIWrapper
from PIL import Image

from tests.conftest import Gateway
from tests.fakes.openai_upstream import FakeOpenAI


def wrapper(gateway: Gateway, **fields: object) -> DallEAPIWrapper:
    key, _ = gateway.create_key(name="langchain")
    return DallEAPIWrapper(  # type: ignore[call-arg]
        model="dall-e-3", api_key=key, base_url=gateway.url + "/v1", max_retries=0, **fields
    )


def download(url: str) -> Image.Image:
    response = httpx.get(url, timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(response.content))
    image.load()
    return image


def test_dalle_wrapper_gets_an_image_url_that_downloads(gateway: Gateway, upstream: FakeOpenAI) -> None:
    url = wrapper(gateway, size="1792x1024", quality="hd").run("a lighthouse at dawn, oil on canvas")
    assert url.startswith(gateway.url + "/v1/files/images/"), url
    assert download(url).size == (1792, 1024)
    sent = upstream.last.json
    # The gateway asked the upstream for base64 and stored the image itself.
    assert sent["model"] == "dall-e-3" and sent["response_format"] == "b64_json"
    assert sent["quality"] == "hd"


def test_dalle_tool_runs_through_the_gateway(gateway: Gateway, upstream: FakeOpenAI) -> None:
    tool = OpenAIDALLEImageGenerationTool(api_wrapper=wrapper(gateway))
    url = tool.invoke("a red fox in the snow")
    assert isinstance(url, str)
    assert download(url).size == (1024, 1024)
    assert upstream.count("/v1/images/generations") == 1
