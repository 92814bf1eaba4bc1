/* rawsend: sends raw Ethernet frames out of one interface of the guest, for the lab's bad-input
 * tests (a guest that sends garbage or floods MAC addresses must change nothing for the others).
 * Built statically by build-image; busybox has nothing that writes arbitrary frames.
 *
 *   rawsend IFACE garbage COUNT    random bytes, random lengths 14..1514
 *   rawsend IFACE macflood COUNT   a new random unicast source MAC per frame, IPv4/UDP inside
 * Prints the number of frames the kernel took. Exit 2 on bad arguments, 1 on socket errors. */
#include <arpa/inet.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 4) { fprintf(stderr, "usage: rawsend IFACE garbage|macflood COUNT\n"); return 2; }
    int flood = strcmp(argv[2], "macflood") == 0;
    if (!flood && strcmp(argv[2], "garbage") != 0) { fprintf(stderr, "unknown mode %s\n", argv[2]); return 2; }
    long count = atol(argv[3]);
    int fd = socket(AF_PACKET, SOCK_RAW, htons(ETH_P_ALL));
    if (fd < 0) { perror("socket"); return 1; }
    struct sockaddr_ll to = {.sll_family = AF_PACKET, .sll_ifindex = (int)if_nametoindex(argv[1]), .sll_halen = 6};
    if (!to.sll_ifindex) { fprintf(stderr, "no interface %s\n", argv[1]); return 2; }
    srandom((unsigned)time(NULL) ^ (unsigned)getpid());
    unsigned char frame[1514];
    long sent = 0;
    for (long i = 0; i < count; i++) {
        size_t len = 14 + (size_t)(random() % (sizeof frame - 14 + 1));
        for (size_t j = 0; j < len; j++) frame[j] = (unsigned char)random();
        if (flood) {
            len = 60;
            memset(frame, 0xff, 6);                         /* to everyone */
            frame[6] = (frame[6] & 0xfc) | 0x02;            /* locally administered unicast source */
            frame[12] = 0x08; frame[13] = 0x00;             /* IPv4 */
            frame[14] = 0x45; frame[15] = 0; frame[16] = 0; frame[17] = 46;
            frame[22] = 64; frame[23] = 17;                 /* TTL, UDP */
        }
        if (sendto(fd, frame, len, 0, (struct sockaddr *)&to, sizeof to) == (ssize_t)len) sent++;
    }
    printf("%ld\n", sent);
    return 0;
}
