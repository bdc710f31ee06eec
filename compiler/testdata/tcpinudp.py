#!/usr/bin/python3
# TCP-in-UDP wire layout, built with scapy from draft-cheshire-tcp-over-udp
# (as multipath-tcp/tcp-in-udp lays it out), independently of sfunnel's
# compiler. Reads hex frames (Ethernet/IP/TCP), one per line; writes two hex
# frames per input: the UDP datagram the draft makes of the segment, and
# the TCP segment the draft makes back of that datagram.
#
#   UDP: sport | dport | length | checksum
#        data offset (4 bits), reserved (3), flags (9; URG cleared) | window
#        sequence number | acknowledgement number | TCP options | payload
import sys
from scapy.all import Ether, IP, IPv6, TCP, UDP, Raw, raw

def ip_of(p, proto):
    ip = p[IP].copy() if IP in p else p[IPv6].copy()
    ip.remove_payload()
    if IP in p:
        ip.proto = proto
        del ip.chksum
        del ip.len
    else:
        ip.nh = proto
        del ip.plen
    return ip

for line in sys.stdin:
    data = bytes.fromhex(line.strip())
    frame = Ether(data)
    tcp = frame[TCP]
    # The IP length says where the segment ends; what follows is Ethernet
    # padding, carried along unchanged.
    iplen = frame[IP].len if IP in frame else 40 + frame[IPv6].plen
    pad = data[14 + iplen:]
    seg = raw(tcp)[:iplen - (frame[IP].ihl * 4 if IP in frame else 40)]
    doff = tcp.dataofs * 4
    opts, payload = seg[20:doff], seg[doff:]
    flags = int(tcp.flags) & ~0x20  # URG has no place in TCP-in-UDP
    word = (tcp.dataofs << 12) | (tcp.reserved << 9) | flags
    body = word.to_bytes(2, "big") + tcp.window.to_bytes(2, "big") + \
        tcp.seq.to_bytes(4, "big") + tcp.ack.to_bytes(4, "big") + opts + payload
    eth = Ether(src=frame.src, dst=frame.dst, type=frame.type)
    udp = eth / ip_of(frame, 17) / UDP(sport=tcp.sport, dport=tcp.dport) / Raw(body)
    udp = Ether(raw(udp))
    print((raw(udp) + pad).hex())

    # And back: the TCP segment of that datagram.
    b = raw(udp[UDP])[8:udp[UDP].len]
    word = int.from_bytes(b[0:2], "big")
    back = TCP(sport=udp[UDP].sport, dport=udp[UDP].dport,
               seq=int.from_bytes(b[4:8], "big"), ack=int.from_bytes(b[8:12], "big"),
               dataofs=word >> 12, reserved=(word >> 9) & 7, flags=word & 0x1ff,
               window=int.from_bytes(b[2:4], "big"), urgptr=0) / Raw(b[12:])
    out = eth / ip_of(udp, 6) / back
    print((raw(out) + pad).hex())
