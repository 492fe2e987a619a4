"""UPnP IGD codec: SSDP, device descriptions (with the hostile ones refused), SOAP both
ways, HTTP framing, fuzzing (only our errors)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nattool.errors import PortmapProtocolError, PortmapRefused
from nattool.protocol import upnp_igd
from nattool.protocol.upnp_igd import IgdService, SoapCall

WANIP1 = "urn:schemas-upnp-org:service:WANIPConnection:1"
WANIP2 = "urn:schemas-upnp-org:service:WANIPConnection:2"
WANPPP1 = "urn:schemas-upnp-org:service:WANPPPConnection:1"
LOCATION = "http://192.168.1.1:5000/rootDesc.xml"

# Shaped like miniupnpd's rootDesc.xml (trimmed): the WAN services sit two devices deep.
DESCRIPTION = f"""<?xml version="1.0"?>
<root xmlns="urn:schemas-upnp-org:device-1-0">
<specVersion><major>1</major><minor>0</minor></specVersion>
<device>
<deviceType>urn:schemas-upnp-org:device:InternetGatewayDevice:1</deviceType>
<serviceList><service><serviceType>urn:schemas-upnp-org:service:Layer3Forwarding:1</serviceType>
<controlURL>/ctl/L3F</controlURL></service></serviceList>
<deviceList><device><deviceType>urn:schemas-upnp-org:device:WANDevice:1</deviceType>
<deviceList><device><deviceType>urn:schemas-upnp-org:device:WANConnectionDevice:1</deviceType>
<serviceList>
<service><serviceType>{WANPPP1}</serviceType><controlURL>/ctl/PPPConn</controlURL></service>
<service><serviceType>{WANIP1}</serviceType><serviceId>urn:upnp-org:serviceId:WANIPConn1</serviceId>
<controlURL>/ctl/IPConn</controlURL><eventSubURL>/evt/IPConn</eventSubURL><SCPDURL>/WANIPCn.xml</SCPDURL></service>
</serviceList></device></deviceList></device></deviceList>
</device></root>""".encode()


# --------------------------------------------------------------------------- SSDP


def test_msearch_is_what_upnp_devices_expect() -> None:
    wire = upnp_igd.build_msearch(upnp_igd.IGD_DEVICE_TYPES[1], mx=2)
    assert wire == (b"M-SEARCH * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\nMAN: \"ssdp:discover\"\r\nMX: 2\r\n"
                    b"ST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n\r\n")
    assert upnp_igd.parse_msearch(wire) == upnp_igd.IGD_DEVICE_TYPES[1]


def test_search_targets_cover_igd_1_2_and_both_wan_services() -> None:
    assert set(upnp_igd.SEARCH_TARGETS) >= {
        "urn:schemas-upnp-org:device:InternetGatewayDevice:1",
        "urn:schemas-upnp-org:device:InternetGatewayDevice:2",
        WANIP1, WANPPP1,
    }


def test_ssdp_response_parse_case_insensitive_headers() -> None:
    # As miniupnpd writes it (header names in capitals, a trailing OPT line).
    wire = (b"HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age=120\r\nST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n"
            b"USN: uuid:abc::urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\nEXT:\r\n"
            b"SERVER: Debian/12 UPnP/1.1 MiniUPnPd/2.3.1\r\nLocation: http://192.168.1.1:5000/rootDesc.xml\r\n"
            b"OPT: \"http://schemas.upnp.org/upnp/1/0/\"; ns=01\r\n\r\n")
    answer = upnp_igd.parse_ssdp_response(wire)
    assert answer.location == LOCATION
    assert answer.search_target.endswith("InternetGatewayDevice:1")
    assert answer.server.endswith("MiniUPnPd/2.3.1")
    assert upnp_igd.parse_ssdp_response(answer.to_wire()).location == LOCATION


@pytest.mark.parametrize("wire", [
    b"HTTP/1.1 404 Not Found\r\nST: x\r\nLOCATION: http://1.2.3.4/\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nST: x\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nST: x\r\nLOCATION: file:///etc/passwd\r\n\r\n",
    b"NOTIFY * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 100 + b"\r\n",
])
def test_bad_ssdp_responses_raise_our_error(wire: bytes) -> None:
    with pytest.raises(PortmapProtocolError):
        upnp_igd.parse_ssdp_response(wire)


# --------------------------------------------------------------------------- description


def test_description_gives_the_wan_services_best_first_with_absolute_urls() -> None:
    services = upnp_igd.parse_device_description(DESCRIPTION, LOCATION)
    assert services == [
        IgdService(WANIP1, "http://192.168.1.1:5000/ctl/IPConn"),
        IgdService(WANPPP1, "http://192.168.1.1:5000/ctl/PPPConn"),
    ]


def test_description_prefers_wanipconnection_2_and_honours_urlbase() -> None:
    xml = (f'<root xmlns="urn:schemas-upnp-org:device-1-0"><URLBase>http://192.168.1.1:49000/</URLBase><device>'
           f"<serviceList><service><serviceType>{WANIP1}</serviceType><controlURL>ip1</controlURL></service>"
           f"<service><serviceType>{WANIP2}</serviceType><controlURL>/upnp/control/ip2</controlURL></service>"
           "</serviceList></device></root>").encode()
    services = upnp_igd.parse_device_description(xml, "http://192.168.1.1:49000/igd.xml")
    assert [s.service_type for s in services] == [WANIP2, WANIP1]
    assert services[0].control_url == "http://192.168.1.1:49000/upnp/control/ip2"
    assert services[1].control_url == "http://192.168.1.1:49000/ip1"


def test_control_urls_on_another_host_are_dropped() -> None:
    xml = (f"<root><device><serviceList><service><serviceType>{WANIP1}</serviceType>"
           "<controlURL>http://10.9.9.9/ctl</controlURL></service></serviceList></device></root>").encode()
    assert upnp_igd.parse_device_description(xml, LOCATION) == []


@pytest.mark.parametrize("xml", [
    b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;">]><root>&lol2;</root>',
    b'<?xml version="1.0"?><!DOCTYPE root SYSTEM "http://evil/x.dtd"><root/>',
    b"<root><device>" + b"<x>" * 10 + b"</root>",
    b"<root>" + b" " * (upnp_igd.MAX_XML + 1) + b"</root>",
    b"\xff\xfe<\x00r\x00",
])
def test_hostile_or_broken_xml_raises_our_error(xml: bytes) -> None:
    with pytest.raises(PortmapProtocolError):
        upnp_igd.parse_device_description(xml, LOCATION)


# --------------------------------------------------------------------------- SOAP


def test_add_port_mapping_request_body_and_headers() -> None:
    call = upnp_igd.add_port_mapping(WANIP1, external_port=40000, internal_port=40001,
                                     internal_client="192.168.1.20", lease_duration=3600, description="a<b")
    wire = call.http_request("http://192.168.1.1:5000/ctl/IPConn")
    msg = upnp_igd.parse_http(wire)
    assert msg.start_line == "POST /ctl/IPConn HTTP/1.1"
    assert msg.header("host") == "192.168.1.1:5000"
    assert msg.header("soapaction") == f'"{WANIP1}#AddPortMapping"'
    assert b"<NewPortMappingDescription>a&lt;b</NewPortMappingDescription>" in msg.body
    # The gateway's side reads back exactly the arguments, in the spec's order.
    back = upnp_igd.parse_soap_call(msg.body)
    assert back == call
    assert [n for n, _ in back.args] == ["NewRemoteHost", "NewExternalPort", "NewProtocol", "NewInternalPort",
                                         "NewInternalClient", "NewEnabled", "NewPortMappingDescription",
                                         "NewLeaseDuration"]
    assert back.arg("NewLeaseDuration") == "3600"


def test_delete_and_get_external_ip_calls() -> None:
    delete = upnp_igd.delete_port_mapping(WANPPP1, external_port=40000)
    assert upnp_igd.parse_soap_call(delete.body()) == SoapCall(
        WANPPP1, "DeletePortMapping", (("NewRemoteHost", ""), ("NewExternalPort", "40000"), ("NewProtocol", "UDP")))
    get = upnp_igd.get_external_ip_address(WANIP1)
    assert upnp_igd.parse_soap_call(get.body()) == get


def test_success_response_and_external_ip() -> None:
    body = upnp_igd.soap_response(WANIP1, "GetExternalIPAddress", (("NewExternalIPAddress", "100.64.0.2"),))
    out = upnp_igd.parse_soap_response(body, "GetExternalIPAddress")
    assert upnp_igd.external_ip_from(out) == ipaddress.IPv4Address("100.64.0.2")
    assert upnp_igd.external_ip_from({"NewExternalIPAddress": ""}) is None
    assert upnp_igd.external_ip_from({"NewExternalIPAddress": "0.0.0.0"}) is None
    with pytest.raises(PortmapProtocolError):
        upnp_igd.external_ip_from({"NewExternalIPAddress": "not-an-ip"})


def test_fault_becomes_portmap_refused_with_the_upnp_code() -> None:
    # miniupnpd's fault for a taken port (ConflictInMappingEntry).
    body = (b'<?xml version="1.0"?>\r\n<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" '
            b's:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body><s:Fault><faultcode>s:Client</faultcode>'
            b'<faultstring>UPnPError</faultstring><detail><UPnPError xmlns="urn:schemas-upnp-org:control-1-0">'
            b"<errorCode>718</errorCode><errorDescription>ConflictInMappingEntry</errorDescription></UPnPError>"
            b"</detail></s:Fault></s:Body></s:Envelope>\r\n")
    with pytest.raises(PortmapRefused) as caught:
        upnp_igd.parse_soap_response(body, "AddPortMapping")
    assert caught.value.code == upnp_igd.ERROR_CONFLICT and caught.value.protocol == "upnp"
    with pytest.raises(PortmapRefused) as caught:
        upnp_igd.parse_soap_response(upnp_igd.soap_fault(725, "OnlyPermanentLeasesSupported"), "AddPortMapping")
    assert caught.value.code == 725


def test_answer_to_another_action_is_refused() -> None:
    body = upnp_igd.soap_response(WANIP1, "DeletePortMapping")
    with pytest.raises(PortmapProtocolError):
        upnp_igd.parse_soap_response(body, "AddPortMapping")


def test_soap_names_are_checked() -> None:
    with pytest.raises(PortmapProtocolError):
        SoapCall(WANIP1, "Add><evil", ())
    with pytest.raises(PortmapProtocolError):
        upnp_igd.add_port_mapping(WANIP1, external_port=0, internal_port=1, internal_client="x", lease_duration=0)


# --------------------------------------------------------------------------- HTTP


def test_http_content_length_chunked_and_to_eof() -> None:
    fixed = upnp_igd.http_response(200, "OK", {"Content-Type": "text/xml"}, b"<a/>")
    assert upnp_igd.parse_http(fixed).body == b"<a/>" and upnp_igd.parse_http(fixed).status == 200
    assert upnp_igd.http_message_complete(fixed)
    assert not upnp_igd.http_message_complete(fixed[:-1])
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n<a/>\r\n3;x=y\r\n<b>\r\n0\r\n\r\n"
    assert upnp_igd.parse_http(chunked).body == b"<a/><b>"
    assert not upnp_igd.http_message_complete(chunked[:-12])
    to_eof = b"HTTP/1.0 200 OK\r\nContent-Type: text/xml\r\n\r\n<a/>"
    assert upnp_igd.parse_http(to_eof, complete=True).body == b"<a/>"
    assert not upnp_igd.http_message_complete(to_eof)


def test_split_http_url() -> None:
    assert upnp_igd.split_http_url("http://192.168.1.1:5000/ctl/IPConn?x=1") == upnp_igd.HttpUrl("192.168.1.1", 5000, "/ctl/IPConn?x=1")
    assert upnp_igd.split_http_url("http://[fe80::1]/").host_header == "[fe80::1]:80"
    for bad in ("https://1.2.3.4/", "http://1.2.3.4:99999/", "ftp://x/", "http:///x"):
        with pytest.raises(PortmapProtocolError):
            upnp_igd.split_http_url(bad)


# --------------------------------------------------------------------------- fuzzing


@given(st.binary(max_size=400))
def test_random_bytes_raise_only_our_errors(data: bytes) -> None:
    for parse in (upnp_igd.parse_ssdp_response, upnp_igd.parse_msearch, upnp_igd.parse_http,
                  lambda d: upnp_igd.parse_device_description(d, LOCATION), upnp_igd.parse_soap_call,
                  lambda d: upnp_igd.parse_soap_response(d, "AddPortMapping")):
        try:
            parse(data)
        except (PortmapProtocolError, PortmapRefused):
            pass
    upnp_igd.http_message_complete(data)


_XML_SAMPLES = [
    DESCRIPTION,
    upnp_igd.soap_fault(718, "ConflictInMappingEntry"),
    upnp_igd.add_port_mapping(WANIP1, external_port=1, internal_port=1, internal_client="1.2.3.4", lease_duration=1).body(),
    upnp_igd.http_response(200, "OK", {}, b"x" * 10),
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n<a/>\r\n0\r\n\r\n",
]


@given(st.sampled_from(_XML_SAMPLES), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=8))
def test_mutated_documents_raise_only_our_errors(sample: bytes, flips: list[tuple[int, int]]) -> None:
    data = bytearray(sample)
    for pos, value in flips:
        data[pos % len(data)] = value
    for parse in (upnp_igd.parse_http, lambda d: upnp_igd.parse_device_description(d, LOCATION),
                  upnp_igd.parse_soap_call, lambda d: upnp_igd.parse_soap_response(d, "AddPortMapping")):
        try:
            parse(bytes(data))
        except (PortmapProtocolError, PortmapRefused):
            pass
