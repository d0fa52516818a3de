"""What a lesson says of a library's behaviour holds for the pinned version: a release that changes it fails here,
before it misleads a learner."""

from __future__ import annotations

import inspect

import anthropic
import httpx2
import openai


def test_anthropics_messages_stream_takes_no_temperature_so_notebook_06_sends_it_in_extra_body():
    client = anthropic.Anthropic(api_key="unused", base_url="http://127.0.0.1:9")
    assert "temperature" not in inspect.signature(client.messages.stream).parameters
    assert "extra_body" in inspect.signature(client.messages.stream).parameters


# openai's own HTTP stack: a stand-in server on its mock transport (no network), speaking vLLM's chat stream.
CHUNK = ('data: {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m", "choices": [{"index": 0, '
         '"delta": {"content": "Hel"}, "finish_reason": null}]}\n\n')
ERROR_AFTER_200 = 'data: {"error": {"message": "engine died", "type": "InternalServerError", "code": 500}}\n\n'


class CutStream(httpx2.SyncByteStream):
    """One chunk, then the connection breaks, as when a replica is killed mid-answer."""

    def __iter__(self):
        yield CHUNK.encode()
        raise httpx2.ReadError("connection closed mid-stream")


def client_over(respond) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://test/v1", api_key="x", max_retries=0,
                         http_client=openai.DefaultHttpxClient(transport=httpx2.MockTransport(respond)))


def read_until_it_fails(client: openai.OpenAI) -> tuple[list[str], Exception]:
    pieces = []
    try:
        for chunk in client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}],
                                                    stream=True):
            pieces.append(chunk.choices[0].delta.content)
    except Exception as error:  # noqa: BLE001 (the type is what is tested)
        return pieces, error
    raise AssertionError("the stream did not fail")


def test_an_error_sent_after_the_200_raises_plain_apierror_after_the_text_before_it():
    """Notebook 03's pattern catches openai.APIError last: neither APIStatusError nor APIConnectionError is raised."""
    client = client_over(lambda request: httpx2.Response(200, content=(CHUNK + ERROR_AFTER_200 + "data: [DONE]\n\n"
                                                                       ).encode(),
                                                         headers={"content-type": "text/event-stream"}))
    pieces, error = read_until_it_fails(client)
    assert pieces == ["Hel"]
    assert type(error) is openai.APIError and "engine died" in error.message
    assert not isinstance(error, openai.APIStatusError | openai.APIConnectionError)


def test_a_connection_cut_mid_stream_raises_apiconnectionerror_as_notebooks_03_and_07_say():
    client = client_over(lambda request: httpx2.Response(200, stream=CutStream(),
                                                         headers={"content-type": "text/event-stream"}))
    pieces, error = read_until_it_fails(client)
    assert pieces == ["Hel"]
    assert isinstance(error, openai.APIConnectionError) and not isinstance(error, openai.APITimeoutError)
